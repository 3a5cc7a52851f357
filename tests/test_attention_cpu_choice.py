"""The CPU attention choice (C++ kernel or SDPA) as data: shipped table, user table, override, tune."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from fastgen import _backend
from fastgen.ops import _attention_cpu_choice as choice
from fastgen.ops import attention

F32, BF16 = torch.float32, torch.bfloat16
TINY_GRID = {"dtype": ("float32",), "training": (False,), "head_dim": (32,), "nq": (16,), "nk": (16,)}


def _rule_before_data(nq, nk, head_dim, dtype, training):
    """The choice as it was written in code before it became data (measured on the AVX-512 BF16 machine)."""
    if dtype == torch.float32:
        return nq >= 16 and head_dim <= 160
    return nq >= 16 or nk >= 1024


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """An empty cache dir, no override, fresh tables and fresh warn-once keys of this module."""
    monkeypatch.setenv("FASTGEN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(choice.ENV, raising=False)

    def forget_warnings():
        for key in [k for k in _backend._warned if k and k[0] == "attention_cpu_choice"]:
            _backend._warned.discard(key)

    forget_warnings()
    choice.reload()
    yield tmp_path / "cache" / choice.FILE_NAME
    choice.reload()
    forget_warnings()


def _write(path, payload):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    choice.reload()


def _table(machine, entries):
    return {"format": 1, "tables": [{"machine": machine, "entries": entries}]}


def _cell(choice_, dtype="float32", training=False, head_dim=32, nq=16, nk=16):
    return {"dtype": dtype, "training": training, "head_dim": head_dim, "nq": nq, "nk": nk, "choice": choice_}


def _kernel_available():
    why = _backend.unavailable_reason("cpu", torch.device("cpu"))
    if why is not None:
        pytest.skip(f"cpu backend: {why}")


# ------------------------------------------------------------------ shipped table


def test_shipped_table_is_the_recorded_choice(isolated):
    for dtype in (F32, BF16, torch.float16):
        for head_dim in (32, 40, 64, 80, 96, 128, 160, 512):
            for nq in (1, 8, 15, 16, 17, 77, 1024, 4096, 16384):
                for nk in (1, 15, 16, 77, 1023, 1024, 4096):
                    for training in (False, True):
                        want = _rule_before_data(nq, nk, head_dim, dtype, training)
                        assert choice.cpu_kernel_is_faster(nq, nk, head_dim, dtype, training) == want, (
                            dtype, head_dim, nq, nk, training)


def test_shipped_file_is_package_data_with_its_machine():
    data = json.loads(choice.SHIPPED.read_text())
    assert data["format"] == choice.FORMAT
    machine = data["tables"][0]["machine"]
    assert machine["isa"] and machine["cpu"]
    assert choice.load_tables(choice.SHIPPED)


def test_answers_are_memoised(isolated):
    choice.cpu_kernel_is_faster(4096, 77, 40, F32, False)
    hits = choice._table_choice.cache_info().hits
    for _ in range(10):
        choice.cpu_kernel_is_faster(4096, 77, 40, F32, False)
    assert choice._table_choice.cache_info().hits == hits + 10


# ------------------------------------------------------------------ override


@pytest.mark.parametrize("value,expected", [("kernel", True), ("sdpa", False)])
def test_env_override_forces_the_choice(isolated, monkeypatch, value, expected):
    monkeypatch.setenv(choice.ENV, value)
    for args in ((1, 1, 512, F32, False), (4096, 4096, 40, F32, False), (4096, 77, 64, BF16, True)):
        assert choice.cpu_kernel_is_faster(*args) is expected
    assert choice.mode() == value


def test_env_auto_uses_the_tables(isolated, monkeypatch):
    monkeypatch.setenv(choice.ENV, "auto")
    assert choice.cpu_kernel_is_faster(4096, 77, 40, F32, False) is True
    assert choice.cpu_kernel_is_faster(8, 77, 40, F32, False) is False
    assert choice.mode() == "auto"


@pytest.mark.parametrize("value", ["Kernel", "cpu", "torch", "", "1"])
def test_env_bad_value_is_a_clear_error(isolated, monkeypatch, value):
    monkeypatch.setenv(choice.ENV, value)
    with pytest.raises(ValueError, match="FASTGEN_ATTENTION_CPU.*auto, kernel, sdpa"):
        choice.cpu_kernel_is_faster(64, 64, 40, F32, False)
    with pytest.raises(ValueError, match="FASTGEN_ATTENTION_CPU"):
        choice.mode()


def test_env_override_reaches_the_op(isolated, monkeypatch):
    q = torch.randn(1, 2, 16, 32)
    want = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    for value in ("sdpa", "kernel", "auto"):
        monkeypatch.setenv(choice.ENV, value)
        torch.testing.assert_close(attention(q, q, q), want, rtol=1e-4, atol=1e-5)
    monkeypatch.setenv(choice.ENV, "fastest")
    with pytest.raises(ValueError, match="FASTGEN_ATTENTION_CPU"):
        attention(q, q, q)


def test_a_named_backend_never_reads_the_choice(isolated, monkeypatch):
    # The measured choice only decides between cpu and torch for an automatic call: a backend named by
    # argument or FASTGEN_BACKEND neither reads the tables nor trips over a bad FASTGEN_ATTENTION_CPU.
    q = torch.randn(1, 2, 16, 32)
    want = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    monkeypatch.setenv(choice.ENV, "fastest")
    torch.testing.assert_close(attention(q, q, q, backend="torch"), want, rtol=1e-4, atol=1e-5)
    monkeypatch.setenv("FASTGEN_BACKEND", "torch")
    torch.testing.assert_close(attention(q, q, q), want, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ user table


def test_user_table_takes_precedence_on_this_machine(isolated):
    shipped = choice.cpu_kernel_is_faster(16, 16, 32, F32, False)
    flipped = "sdpa" if shipped else "kernel"
    _write(isolated, _table(choice.this_machine(), [_cell(flipped)]))
    assert choice.cpu_kernel_is_faster(16, 16, 32, F32, False) is (flipped == "kernel")
    # the cell covers larger shapes up to the next grid value (here: all of them) ...
    assert choice.cpu_kernel_is_faster(4096, 1024, 64, F32, False) is (flipped == "kernel")
    # ... and what the user table does not measure keeps the shipped choice
    assert choice.cpu_kernel_is_faster(16, 16, 32, F32, True) is _rule_before_data(16, 16, 32, F32, True)
    assert choice.cpu_kernel_is_faster(4096, 77, 40, BF16, False) is True


def test_floor_lookup_between_grid_values(isolated):
    entries = [_cell("sdpa", nq=1, nk=16), _cell("kernel", nq=64, nk=16),
               _cell("sdpa", nq=1, nk=1024), _cell("sdpa", nq=64, nk=1024)]
    _write(isolated, _table(choice.this_machine(), entries))
    assert choice.cpu_kernel_is_faster(63, 16, 32, F32, False) is False  # floor of 63 is 1
    assert choice.cpu_kernel_is_faster(64, 1023, 32, F32, False) is True
    assert choice.cpu_kernel_is_faster(5000, 1, 32, F32, False) is True  # below the smallest nk: its cell
    assert choice.cpu_kernel_is_faster(64, 1024, 32, F32, False) is False


def test_user_table_of_another_machine_is_ignored_with_a_warning(isolated):
    other = dict(choice.this_machine(), cpu="Some Other CPU")
    shipped = choice.cpu_kernel_is_faster(16, 16, 32, F32, False)
    _write(isolated, _table(other, [_cell("sdpa" if shipped else "kernel")]))
    with pytest.warns(RuntimeWarning, match="Some Other CPU"):
        assert choice.cpu_kernel_is_faster(16, 16, 32, F32, False) is shipped


@pytest.mark.parametrize(
    "payload,match",
    [
        ("{not json", "not valid JSON"),
        ([1, 2], "JSON object"),
        ({"format": 99, "tables": []}, "format"),
        ({"format": 1, "tables": []}, "tables"),
        ({"format": 1, "tables": [{"entries": []}]}, "machine"),
        (None, r"entries\[0\]"),  # a cell with an unknown choice
        ("", "not valid JSON"),
    ],
)
def test_malformed_user_file_warns_and_uses_the_shipped_table(isolated, payload, match):
    if payload is None:
        payload = _table(choice.this_machine(), [_cell("maybe")])
    _write(isolated, payload if isinstance(payload, str) else json.dumps(payload))
    with pytest.warns(RuntimeWarning, match=match):
        got = choice.cpu_kernel_is_faster(4096, 77, 40, F32, False)
    assert got is True
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per file, not per call
        choice.reload()
        choice.cpu_kernel_is_faster(8, 77, 40, F32, False)
    with pytest.raises(choice.ChoiceFileError, match=match):
        choice.load_tables(isolated)


# ------------------------------------------------------------------ tune


@pytest.mark.filterwarnings("ignore:attention CPU choice file .* was measured on 'Some Other CPU'")
def test_tune_writes_a_file_that_is_then_used(isolated):
    _kernel_available()
    from fastgen.bench.attention import tune

    other = {"machine": {"cpu": "Some Other CPU", "isa": "portable"}, "entries": [_cell("sdpa")]}
    _write(isolated, {"format": 1, "tables": [other]})
    path, table = tune(grid=TINY_GRID, min_time=0.001, progress=False)
    assert path == isolated and path.is_file()
    data = json.loads(path.read_text())
    assert data["tables"][0] == other  # other machines' tables are kept
    mine = data["tables"][-1]
    assert mine == table and mine["complete"] is True
    assert {k: mine["machine"][k] for k in ("cpu", "isa")} == {k: choice.this_machine()[k] for k in ("cpu", "isa")}
    (cell,) = mine["entries"]
    assert cell["kernel_ms"] > 0 and cell["sdpa_ms"] > 0
    assert cell["choice"] == ("kernel" if cell["kernel_ms"] < cell["sdpa_ms"] else "sdpa")
    assert choice.cpu_kernel_is_faster(16, 16, 32, F32, False) is (cell["choice"] == "kernel")
    # the measured answer is the one used: flip it in the file and the choice follows
    cell["choice"] = "sdpa" if cell["choice"] == "kernel" else "kernel"
    _write(isolated, data)
    assert choice.cpu_kernel_is_faster(16, 16, 32, F32, False) is (cell["choice"] == "kernel")


def test_tune_budget_leaves_cells_to_the_shipped_table(isolated):
    _kernel_available()
    from fastgen.bench.attention import tune

    grid = dict(TINY_GRID, nq=(16, 32))
    _, table = tune(grid=grid, min_time=0.001, budget_s=0.0, progress=False)
    assert table["complete"] is False and len(table["entries"]) == 1
    assert choice.load_tables(isolated)


def test_cli_tune(isolated, monkeypatch, capsys, tmp_path):
    _kernel_available()
    from fastgen import cli
    from fastgen.bench import attention as bench_attention

    monkeypatch.setattr(bench_attention, "QUICK_TUNE_GRID", TINY_GRID)
    out = tmp_path / "elsewhere" / "choice.json"
    assert cli.main(["bench", "attention", "--tune", "--quick", "--min-time", "0.001", "--tune-out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and out.is_file()
    assert choice.load_tables(out)
    assert cli.main(["bench", "group_norm", "--tune"]) == 2
