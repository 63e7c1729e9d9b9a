"""What a user meets at the edges (issue 31): indices the value checks did not see, options that
would be ignored, numpy and 0-d scalars, mixed dtypes, an empty batch, Triton set up late or not
installed, non-finite inputs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import soda_kernels as sk
from soda_kernels.reference import TOLERANCE

from .utils import DEVICE, compare_with_reference, make_bpr_inputs

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ["torch", "triton"]
# The interpreter's numpy arithmetic warns where the non-finite inputs meet.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
MODES = ["sampled", "items", "users", "both", "mean"]
BAD_INDICES = {"past N": 8, "far past N": 2**40, "negative": -3}  # N = 8 items


def _inputs(mode, seed=0, **options):
    """Six rows with distinct positives into N = 8 items (three negatives a row when sampled)."""
    return make_bpr_inputs(
        6,
        8,
        2,
        5,
        3,
        samples=3 if mode == "sampled" else None,
        duplicates=False,
        generator=torch.Generator().manual_seed(seed),
        **options,
    )


def _loss(inputs, mode, backend, **options):
    in_batch = "items" if mode == "sampled" else mode
    return sk.distributional_bpr(**inputs, in_batch=in_batch, backend=backend, **options)


def _run_python(code: str, **environment) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(environment, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


# ----------------------------------------------------------------------------------------------
# 2. Indices outside their range, unchecked (validate=False, torch.compile): never read, NaN loss.


def _with_bad_index(mode, field, bad):
    inputs = _inputs(mode)
    index = inputs[field].clone()
    if field == "negatives":
        index[1, 1] = bad
    else:
        index[1] = bad
    inputs[field] = index
    return inputs


BAD_CASES = [(mode, "positives", kind) for mode in MODES for kind in BAD_INDICES]
BAD_CASES += [("sampled", "negatives", kind) for kind in BAD_INDICES]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode, field, kind", BAD_CASES)
def test_unchecked_index_gives_nan_not_a_read(backend, mode, field, kind):
    inputs = _with_bad_index(mode, field, BAD_INDICES[kind])
    rows = _loss(inputs, mode, backend, reduction="none", validate=False)
    # Row 1 holds the bad index. Sampled: only its row is NaN. In-batch: its row and, for "items"
    # and "both", every row with it as a negative (its column of scores is NaN).
    assert torch.isnan(rows[1])
    if mode in ("sampled", "users", "mean"):
        assert torch.isfinite(rows[[0, 2, 3, 4, 5]]).all(), rows
    loss = _loss(inputs, mode, backend, validate=False)
    assert torch.isnan(loss)
    loss.backward()
    # Gradients: NaN, never a finite gradient of a stand-in row: the codebooks' throughout, and
    # the user row holding the bad index.
    assert torch.isnan(inputs["codebooks"].grad).all()
    assert torch.isnan(inputs["user"].grad[1]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_unchecked_padding_and_bad_positive_minus_one(backend):
    # -1 in negatives is padding (no term, finite); -1 in positives is an index outside [0, N).
    inputs = _inputs("sampled")
    inputs["negatives"][1] = -1
    rows = _loss(inputs, "sampled", backend, reduction="none", validate=False)
    assert torch.isfinite(rows).all() and rows[1] == 0
    inputs["negatives"][1, 0] = 3
    inputs["positives"][1] = -1
    rows = _loss(inputs, "sampled", backend, reduction="none", validate=False)
    assert torch.isnan(rows[1]) and torch.isfinite(rows[[0, 2, 3, 4, 5]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["sampled", "items", "mean"])
def test_compiled_call_with_bad_index_gives_nan(backend, mode):
    # Under torch.compile the value checks never run: the NaN is what shows the error.
    field = "negatives" if mode == "sampled" else "positives"
    inputs = _with_bad_index(mode, field, BAD_INDICES["past N"])
    compiled = torch.compile(lambda data: _loss(data, mode, backend), fullgraph=True, backend="aot_eager")
    assert torch.isnan(compiled(inputs))


# ----------------------------------------------------------------------------------------------
# 3. Options that would be ignored raise, and the module checks its options at construction.


def test_user_temperature_with_user_logits_is_refused():
    inputs = _inputs("items", user_logits=True)
    with pytest.raises(ValueError, match="user_temperature"):
        sk.distributional_bpr(**inputs, user_logits=True, user_temperature=0.5)
    with pytest.raises(ValueError, match="user_temperature"):
        sk.DistributionalBPRLoss(user_logits=True, user_temperature=0.5)


@pytest.mark.parametrize(
    "weights",
    [torch.ones(2, requires_grad=True), [torch.ones((), requires_grad=True), 1.0]],
    ids=["tensor", "sequence"],
)
def test_layer_weights_requiring_grad_are_refused(weights):
    # Layer weights get no gradient (SPEC); a tensor that asks for one is refused, not ignored.
    with pytest.raises(ValueError, match="layer_weights"):
        sk.distributional_bpr(**_inputs("items"), layer_weights=weights)
    with pytest.raises(ValueError, match="layer_weights"):
        sk.DistributionalBPRLoss(layer_weights=weights)


@pytest.mark.parametrize(
    "options, error, name",
    [
        (dict(in_batch="itemz"), ValueError, "in_batch"),
        (dict(temperature=-1), ValueError, "temperature"),
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(backend="gpu"), ValueError, "backend"),
        (dict(symmetric="yes"), TypeError, "symmetric"),
        (dict(user_temperature=0.0), ValueError, "user_temperature"),
        (dict(layer_weights=[1.0, -1.0]), ValueError, "layer_weights"),
        (dict(validate=1), TypeError, "validate"),
    ],
)
def test_module_checks_options_at_construction(options, error, name):
    with pytest.raises(error, match=name):
        sk.DistributionalBPRLoss(**options)


# ----------------------------------------------------------------------------------------------
# 4. numpy numbers and bools, 0-d tensors; type errors name the type exactly.


@pytest.mark.parametrize(
    "options",
    [
        dict(temperature=np.float32(0.5), symmetric=np.True_, user_temperature=np.float64(0.7)),
        dict(temperature=torch.tensor(0.5), symmetric=torch.tensor(True), user_temperature=torch.tensor(0.7)),
        dict(temperature=np.int64(1), validate=np.False_, user_logits=np.False_),
    ],
    ids=["numpy", "0-d tensors", "numpy int and bools"],
)
def test_numpy_and_0d_scalars_are_accepted(options):
    inputs = _inputs("items")
    plain = {k: v.item() for k, v in options.items()}
    expected = sk.distributional_bpr(**inputs, backend="torch", **plain)
    assert torch.equal(sk.distributional_bpr(**inputs, backend="torch", **options), expected)
    module = sk.DistributionalBPRLoss(backend="torch", **options)
    assert torch.equal(module(**inputs), expected)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(temperature="0.5"), "temperature must be a positive number, got str"),
        (dict(temperature=np.complex64(1)), "got numpy.complex64"),
        (dict(temperature=np.True_), "got numpy.bool"),
        (dict(temperature=torch.tensor(0.5, requires_grad=True)), "got torch.Tensor"),
        (dict(temperature=torch.tensor([0.5])), "got torch.Tensor"),
        (dict(symmetric=np.int64(1)), "symmetric must be a bool, got numpy.int64"),
        (dict(user_logits=torch.tensor(1.0)), "user_logits must be a bool, got torch.Tensor"),
    ],
)
def test_type_errors_name_the_type_exactly(options, message):
    with pytest.raises(TypeError, match=message):
        sk.distributional_bpr(**_inputs("items"), **options)


# ----------------------------------------------------------------------------------------------
# 5. Mixed dtypes: computed in float32, float64 when any input is float64 (torch backend only).


@pytest.mark.parametrize("mode", ["sampled", "items", "mean"])
def test_mixed_float64_and_float32_computes_in_float64(mode):
    inputs = _inputs(mode, seed=3)
    inputs["user"] = inputs["user"].detach().double().requires_grad_()
    errors = compare_with_reference(
        inputs,
        "torch",
        tolerance=TOLERANCE[torch.float32],
        in_batch="items" if mode == "sampled" else mode,
        symmetric=True,
    )
    assert max(errors.values()) < TOLERANCE[torch.float32]
    assert _loss(inputs, mode, "torch").dtype == torch.float64
    with pytest.raises(TypeError, match="user is torch.float64"):
        _loss(inputs, mode, "triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_16bit_and_float32_computes_in_float32(backend):
    inputs = _inputs("both", seed=4)
    inputs["items"] = inputs["items"].detach().bfloat16().requires_grad_()
    loss = _loss(inputs, "both", backend)
    assert loss.dtype == torch.float32
    loss.backward()
    assert inputs["items"].grad.dtype == torch.bfloat16 and inputs["user"].grad.dtype == torch.float32


# ----------------------------------------------------------------------------------------------
# 6. An empty batch has no terms: 0.0 with zero gradients.


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("mode", MODES)
def test_empty_batch_is_zero_with_zero_gradients(backend, reduction, mode):
    inputs = _inputs(mode)
    inputs["user"] = inputs["user"].detach()[:0].requires_grad_()
    inputs["positives"] = inputs["positives"][:0]
    if inputs["negatives"] is not None:
        inputs["negatives"] = inputs["negatives"][:0]
    loss = _loss(inputs, mode, backend, reduction=reduction)
    assert loss.shape == ((0,) if reduction == "none" else ()) and loss.dtype == torch.float32
    assert (loss == 0).all()
    loss.sum().backward()
    for name in ("user", "items", "codebooks"):
        grad = inputs[name].grad
        assert grad is not None and grad.shape == inputs[name].shape and (grad == 0).all(), name


# ----------------------------------------------------------------------------------------------
# 7, 8. Triton's interpreter set too late; Triton not installed; the packaging metadata.


@pytest.mark.skipif(DEVICE.type == "cuda", reason="the interpreter matters for CPU tensors only")
def test_interpreter_set_after_import_gets_the_library_message():
    result = _run_python(
        "import os, torch, soda_kernels as sk\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "x, c = torch.randn(3, 2, 4), torch.randn(2, 5, 4)\n"
        "try:\n"
        "    sk.codebook_log_softmax(x, c, backend='triton')\n"
        "except RuntimeError as error:\n"
        "    print(error)\n"
    )
    assert "TRITON_INTERPRET=1 was set after soda_kernels was imported" in result.stdout, result.stderr


NO_TRITON = """
import sys

class NoTriton:
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r}")

sys.meta_path.insert(0, NoTriton())
import torch
import soda_kernels as sk

assert not any(name == "triton" or name.startswith("triton.") for name in sys.modules)
g = torch.Generator().manual_seed(0)
user, items = torch.randn(4, 2, 3, generator=g), torch.randn(6, 2, 3, generator=g)
codebooks = torch.randn(2, 5, 3, generator=g)
positives = torch.tensor([0, 1, 2, 3])
for backend in ("torch", "auto"):
    assert torch.isfinite(sk.distributional_bpr(user, items, codebooks, positives, backend=backend))
    assert sk.codebook_log_softmax(items, codebooks, backend=backend).shape == (6, 2, 5)
try:
    sk.distributional_bpr(user, items, codebooks, positives, backend="triton")
except RuntimeError as error:
    print("refused:", error)
"""


def test_import_and_torch_backend_work_without_triton():
    result = _run_python(NO_TRITON, TRITON_INTERPRET="1")
    assert result.returncode == 0, result.stderr
    assert "refused: backend='triton' needs the triton package" in result.stdout
    assert "Linux" in result.stdout


def test_packaging_metadata():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    triton = [d for d in project["dependencies"] if d.startswith("triton")]
    assert triton == ["triton>=3.0; platform_system == 'Linux'"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    assert "Apache License" in (ROOT / "LICENSE").read_text()


# ----------------------------------------------------------------------------------------------
# 9. Non-finite inputs: a non-finite loss (its rows for "none"), the same on both backends.


def _poison(case, inputs):
    with torch.no_grad():
        if case == "logits -inf":  # codes of probability 0 in the user's distribution
            inputs["user"][1, 0, :2] = -float("inf")
        elif case == "logits nan":
            inputs["user"][1, 0, 0] = float("nan")
        elif case == "item nan":
            inputs["items"][inputs["positives"][1], 0, 0] = float("nan")
        elif case == "user inf":
            inputs["user"][1, 0, 0] = float("inf")
        else:  # "codebook inf"
            inputs["codebooks"][0, 0, 0] = float("inf")


@pytest.mark.parametrize("case", ["logits -inf", "logits nan", "item nan", "user inf", "codebook inf"])
@pytest.mark.parametrize("mode", MODES)
def test_non_finite_inputs_give_the_same_non_finite_loss_on_both_backends(case, mode):
    user_logits = case.startswith("logits")
    results = {}
    for backend in BACKENDS:
        inputs = _inputs(mode, seed=5, user_logits=user_logits)
        _poison(case, inputs)
        rows = _loss(inputs, mode, backend, reduction="none", user_logits=user_logits)
        assert not torch.isfinite(rows[1]), (backend, rows)  # the row holding the non-finite input
        assert not torch.isfinite(_loss(inputs, mode, backend, user_logits=user_logits))
        results[backend] = rows.detach()
    torch_rows, triton_rows = results["torch"], results["triton"]
    assert torch.equal(torch.isnan(torch_rows), torch.isnan(triton_rows))
    assert torch.equal(torch.isinf(torch_rows), torch.isinf(triton_rows))
    finite = torch.isfinite(torch_rows)
    torch.testing.assert_close(triton_rows[finite], torch_rows[finite], rtol=1e-4, atol=1e-5)
