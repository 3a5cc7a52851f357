"""Loading and saving weights: diffusers' folder layout, original Stable Diffusion single files, pipelines.

Only safe formats are read: safetensors, or ``torch.load(weights_only=True)`` for ``.bin`` / ``.ckpt`` /
``.pt``, which refuses (and never runs) a pickle holding anything but tensors and plain containers. Nothing is
ever downloaded: paths are local files and folders. Every problem with a checkpoint raises
:class:`CheckpointError` (a ``ValueError``) naming the file; a missing file or folder raises
:class:`CheckpointNotFoundError`, also a ``FileNotFoundError``. See docs/design.md, "Loading and saving
weights".
"""

from .files import (
    CheckpointError,
    CheckpointNotFoundError,
    check_state_dict,
    load_model,
    load_state_dict,
    resolve_weights,
    save_model,
)
from .pipeline import LoadedPipeline, load_pipeline
from .single_file import (
    convert_sd_unet,
    convert_sd_vae,
    from_single_file,
    infer_sd_unet_config,
    infer_sd_vae_config,
)

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "LoadedPipeline",
    "check_state_dict",
    "convert_sd_unet",
    "convert_sd_vae",
    "from_single_file",
    "infer_sd_unet_config",
    "infer_sd_vae_config",
    "load_model",
    "load_pipeline",
    "load_state_dict",
    "resolve_weights",
    "save_model",
]
