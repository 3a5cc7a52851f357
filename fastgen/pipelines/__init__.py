"""Sampling pipelines and the batch sampler that serves them.

* :class:`LatentDiffusionPipeline`: fastgen's own diffusion models (text, class or unconditional) behind
  diffusers' pipeline call, loaded from local diffusers-layout folders.
* :class:`BatchSampler`: a run-many-requests-at-once sampler over a ``LatentDiffusionPipeline`` or a (patched)
  diffusers ``StableDiffusionPipeline``: per-sample seeds, buffers per shape, and on a GPU the whole
  denoising loop replayed as a CUDA graph per shape.
* :class:`SampleRequest` / :class:`SampleResult`: what the sampler, ``fastgen.serve``'s queue, the HTTP server
  and the Ray Serve deployment pass between them.
"""

from .batch_sampler import BatchSampler, load_sampler
from .latent_diffusion import ImagePipelineOutput, LatentDiffusionPipeline
from .request import SampleRequest, SampleResult

__all__ = ["BatchSampler", "ImagePipelineOutput", "LatentDiffusionPipeline", "SampleRequest", "SampleResult",
           "load_sampler"]
