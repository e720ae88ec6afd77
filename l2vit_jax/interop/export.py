"""A finetuned checkpoint as self-contained inference files: a ``jax.export`` artifact and an ONNX model.

Both files compute the same function, ``images (B, H, W, 8) float32 → (prob (B,), mass (B,))``:
raw pixels as the jet files store them in, the class-1 (top) probability and the jet mass in GeV out.
The checkpoint's pixel scale (images are divided by it, as in training) and its train-split mass
de-standardisation (``mass_z · mass_std + mass_mean``) are applied inside, so a file needs nothing
from this package to be used; the batch size ``B`` is symbolic (any batch size). A JSON sidecar
records the meta, the input and output names and shapes, and how closely the ONNX model reproduced
the JAX function when it was written.

Invariants of the exported function:

* it is the model in eval mode (dropout off, BatchNorm on its running statistics), as
  ``evaluation.evaluate.predict`` runs it;
* it computes in float32 whatever dtype the model trained in (bfloat16 has no portable ONNX kernels,
  and float32 only adds precision);
* the LCM's depthwise convolutions use the 'lax' formulation (``models/depthwise.py``): a grouped
  convolution, which every backend and ONNX (``Conv`` with ``group``) run natively, whereas the
  CPU-tuned 'shifted_adds_vjp' is a loop over the 49 taps' shifted multiply-adds with a custom
  gradient, which converters do not know. Every
  formulation computes the same function, so this changes no result beyond rounding.

What converts to ONNX (jax2onnx 0.13, opset 17): everything the model uses — the patch-embedding
matmul, LayerNorm, the ReLU linear attention (einsums at HIGHEST precision), the grouped convolution,
BatchNorm, the exact erf GELU (ONNX ``Erf``) and softmax.
"""

from __future__ import annotations

import logging as python_logging
import math
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from l2vit_jax.checkpoint import model_io
from l2vit_jax.data import hdf5
from l2vit_jax.errors import ExportError, one_line
from l2vit_jax.runtime import paths

JAX_FILE = "model.jax_export"
ONNX_FILE = "model.onnx"
SIDECAR_FILE = "model.json"
FORMATS = ("jax", "onnx")
INPUT_NAME = "images"
OUTPUT_NAMES = ("prob", "mass")
# The platforms the jax.export artifact is lowered for: one StableHLO module per platform, chosen at
# call time by the platform that runs it.
JAX_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
# The oldest opset with LayerNormalization, so that older runtimes (ONNX Runtime 1.12 on) run the file;
# the converter's default, 23, converts the same graph.
ONNX_OPSET = 17
DEPTHWISE_IMPLEMENTATION = "lax"
# Images of the self-check that compares the ONNX model with the JAX function when it is written.
CHECK_BATCH = 3


def _meta_numbers(directory: str, meta: dict) -> tuple[float, float, float]:
  """(pixel_scale, mass_mean, mass_std) of a finetuned checkpoint (``model_io`` checked their types)."""
  if meta.get("mass_mean") is None or meta.get("mass_std") is None:
    raise ExportError(
      f"{directory}: not a finetuned checkpoint (its meta has no mass standardisation, "
      f"task {meta.get('task')!r}); export a finetune or scratch run"
    )
  return float(meta.get("pixel_scale", 1.0)), float(meta["mass_mean"]), float(meta["mass_std"])


def inference_function(
  model: nnx.Module,
  meta: dict,
  *,
  directory: str = "checkpoint",
) -> Callable[[jax.Array], tuple[jax.Array, jax.Array]]:
  """``images (B, H, W, 8) float32 → (prob (B,), mass in GeV (B,))`` of a finetuned ``model``.

  The model is switched to eval mode, float32 compute and the 'lax' depthwise formulation (module
  docstring); its weights become constants of the function.
  """
  pixel_scale, mass_mean, mass_std = _meta_numbers(directory, meta)
  model.eval()
  model.set_attributes(depthwise_implementation=DEPTHWISE_IMPLEMENTATION)
  model.set_attributes(dtype=None, raise_if_not_found=False)  # float32 compute (parameters are float32)
  graphdef, state = nnx.split(model)

  def predict(images: jax.Array) -> tuple[jax.Array, jax.Array]:
    logits, mass_z = nnx.merge(graphdef, state)(images.astype(jnp.float32) / jnp.float32(pixel_scale))
    prob = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[:, 1]
    mass = mass_z[:, 0].astype(jnp.float32) * jnp.float32(mass_std) + jnp.float32(mass_mean)
    return prob, mass

  return predict


def image_shape(meta: dict) -> tuple[int, int, int]:
  size = int(meta["model_config"]["img_size"])
  return size, size, int(meta["model_config"].get("in_channels", hdf5.NUM_CHANNELS))


def export_jax(predict: Callable, shape: tuple[int, int, int]) -> bytes:
  """The serialized ``jax.export`` artifact of ``predict`` with a symbolic batch dimension ``b``.

  Reload with ``jax.export.deserialize(bytearray(data)).call(images)``.
  """
  (batch,) = jax.export.symbolic_shape("b")
  spec = jax.ShapeDtypeStruct((batch, *shape), jnp.float32)
  exported = jax.export.export(jax.jit(predict), platforms=JAX_PLATFORMS)(spec)
  return bytes(exported.serialize())


def export_onnx(predict: Callable, shape: tuple[int, int, int], *, opset: int = ONNX_OPSET) -> bytes:
  """The ONNX model of ``predict`` (jax2onnx), batch dimension ``batch``, serialized.

  Raises:
    ExportError: jax2onnx is not installed (the ``export`` extra), or cannot convert an operation
      (its message names the primitive).
  """
  # jax2onnx 0.13 logs a traceback for each of its dm_pix plugins that predate jax 0.10 (unused here),
  # and onnx_ir a warning for every shape-only value it serialises: nothing a user can act on.
  loggers = [python_logging.getLogger(name) for name in ("jax2onnx", "onnx_ir")]
  levels = [logger.level for logger in loggers]
  for logger in loggers:
    logger.setLevel(python_logging.ERROR)
  try:
    try:
      import jax2onnx  # pylint: disable=import-outside-toplevel
    except ImportError as error:
      raise ExportError(f'the ONNX export needs jax2onnx ({error}): pip install -e ".[export]"') from None
    try:
      model = jax2onnx.to_onnx(
        predict,
        inputs=[("batch", *shape)],
        model_name="l2vit",
        opset=opset,
        input_names=[INPUT_NAME],
        output_names=list(OUTPUT_NAMES),
      )
    except Exception as error:  # pylint: disable=broad-except  # the converter's refusals share no type
      raise ExportError(
        f"jax2onnx cannot convert the model: {type(error).__name__}: {one_line(error, 300)}"
      ) from error
  finally:
    for logger, level in zip(loggers, levels):
      logger.setLevel(level)
  return model.SerializeToString()


def onnx_difference(onnx_bytes: bytes, predict: Callable, images: np.ndarray) -> float | None:
  """Largest absolute difference between the ONNX model's and ``predict``'s outputs on ``images``;
  None where onnxruntime is not installed."""
  try:
    import onnxruntime  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  session = onnxruntime.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
  got = session.run(list(OUTPUT_NAMES), {INPUT_NAME: images})
  want = jax.jit(predict)(images)
  return max(float(np.max(np.abs(np.asarray(g) - np.asarray(w)))) for g, w in zip(got, want))


def check_images(shape: tuple[int, int, int], n: int = CHECK_BATCH) -> np.ndarray:
  """Fixed sparse, positive jet-like images (2 % of pixels hit, exponential energies)."""
  rng = np.random.default_rng(0)
  images = np.zeros((n, *shape), np.float32)
  hits = rng.random(images.shape) < 0.02
  images[hits] = rng.exponential(5.0, hits.sum())
  return images


def export_checkpoint(
  directory: str, output: str, *, formats: tuple[str, ...] = FORMATS, opset: int = ONNX_OPSET
) -> dict:
  """Writes the ``formats`` of the finetuned checkpoint in ``directory`` and the sidecar to ``output``.

  Each file is written whole or not at all (``paths.write_bytes``). The sidecar is written last,
  listing the files made; if the ONNX conversion fails the JAX artifact and the sidecar are still
  written, then the error is raised.

  Returns:
    The sidecar's contents.

  Raises:
    ExportError, or the checkpoint's own UserError (missing, damaged, mismatched).
  """
  unknown = sorted(set(formats) - set(FORMATS))
  if unknown or not formats:
    raise ExportError(f"unknown export format(s) {unknown or list(formats)}; use some of {list(FORMATS)}")
  model, meta = model_io.restore_model_checkpoint(directory)
  predict = inference_function(model, meta, directory=directory)
  shape = image_shape(meta)
  try:
    os.makedirs(output, exist_ok=True)
  except OSError as error:
    raise ExportError(f"{output}: cannot create the output directory: {error}") from None
  pixel_scale, mass_mean, mass_std = _meta_numbers(directory, meta)
  sidecar = {
    "format": "l2vit_jax.export",
    "checkpoint": directory,
    "files": {},
    "input": {
      "name": INPUT_NAME,
      "shape": ["batch", *shape],
      "dtype": "float32",
      "meaning": "raw pixels as the jet files store them (divided by pixel_scale inside)",
    },
    "outputs": [
      {"name": "prob", "shape": ["batch"], "dtype": "float32", "meaning": "class-1 (top) probability"},
      {"name": "mass", "shape": ["batch"], "dtype": "float32", "meaning": "jet mass in GeV"},
    ],
    "pixel_scale": pixel_scale,
    "mass_mean": mass_mean,
    "mass_std": mass_std,
    "model_config": meta["model_config"],
    "task": meta.get("task"),
    "compute_dtype": "float32",
    "depthwise_implementation": DEPTHWISE_IMPLEMENTATION,
    "jax_version": jax.__version__,
  }
  failure = None
  if "jax" in formats:
    paths.write_bytes(os.path.join(output, JAX_FILE), export_jax(predict, shape))
    sidecar["files"]["jax"] = {"file": JAX_FILE, "platforms": list(JAX_PLATFORMS), "batch_dimension": "b"}
  if "onnx" in formats:
    try:
      onnx_bytes = export_onnx(predict, shape, opset=opset)
    except ExportError as error:
      failure = error
    else:
      paths.write_bytes(os.path.join(output, ONNX_FILE), onnx_bytes)
      difference = float(onnx_difference(onnx_bytes, predict, check_images(shape)))
      sidecar["files"]["onnx"] = {
        "file": ONNX_FILE,
        "opset": opset,
        "batch_dimension": "batch",
        # strict JSON has no NaN: a broken conversion's difference is recorded as its name
        "max_abs_difference_to_jax": difference if math.isfinite(difference) else str(difference),
      }
  paths.write_json(os.path.join(output, SIDECAR_FILE), sidecar)
  if failure is not None:
    raise ExportError(f"{failure} (the other formats were written to {output})") from failure
  return sidecar
