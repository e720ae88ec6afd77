"""Masked-image pretraining: masks keep the grid, the loss learns, the LCM trains, the bridge loads it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import flat_params, tiny_config, write_jet_file
from l2vit_jax import models
from l2vit_jax.checkpoint import model_io, naming
from l2vit_jax.training import loop, objectives, optimizer, recipes, steps


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp("data")
  return {
    "labelled": write_jet_file(root / "labelled.h5", num=64),
    "unlabelled": write_jet_file(root / "unlabelled.h5", num=48, labelled=False),
  }


def test_token_mask_has_the_exact_ratio_and_differs_per_image():
  mask = models.random_token_mask(jax.random.key(0), 4, 25, 0.6)
  assert mask.shape == (4, 25) and (mask.sum(axis=1) == 15).all()
  assert len({tuple(row) for row in np.asarray(mask)}) == 4


def test_patchify_follows_the_token_grid():
  images = jnp.arange(2 * 10 * 10 * 3, dtype=jnp.float32).reshape(2, 10, 10, 3)
  patches = models.patchify(images, 5)
  assert patches.shape == (2, 4, 75)
  np.testing.assert_array_equal(patches[1, 1].reshape(5, 5, 3), images[1, :5, 5:])


def test_masked_tokens_keep_the_grid_and_change_only_through_the_mask(files):
  model = recipes.build_task(tiny_config("mae", unlabelled_path=files["unlabelled"])).model
  model.eval()
  images = jnp.asarray(np.random.default_rng(0).exponential(1.0, (2, 25, 25, 8)), jnp.float32)
  mask = models.random_token_mask(jax.random.key(1), 2, 25, 0.5)
  masked = model(images, mask)
  assert masked.shape == (2, 25, 5 * 5 * 8)
  # Replacing the content of masked patches must not change the output: the model never sees it.
  scrambled = jnp.where(jnp.repeat(jnp.repeat(mask.reshape(2, 5, 5), 5, 1), 5, 2)[..., None], 7.0, images)
  np.testing.assert_allclose(model(scrambled, mask), masked, atol=1e-5)


def _losses_and_grads(files, mode, num_steps=3):
  config = tiny_config("mae", unlabelled_path=files["unlabelled"], warmup_epochs=0)
  config.mae.mode = mode
  task = recipes.build_task(config)
  batch = {"image": jnp.asarray(np.stack([task.train_source[i]["image"] for i in range(8)]))}
  task.model.train()
  graphdef, params, batch_stats, other = nnx.split(task.model, nnx.Param, nnx.BatchStat, ...)
  tx = optimizer.make_optimizer(config, optimizer.learning_rate_schedules(config, 10, 100))
  step_fn = steps.make_train_step(graphdef, task.loss, tx, jax.random.key(0))
  opt_state, losses = tx.init(params), []

  def grads_of(params):
    def loss(p):
      model = nnx.merge(graphdef, p, batch_stats, other, copy=True)
      return task.loss(model, batch)[0]

    return jax.grad(loss)(params)

  grads = naming.flatten_names(nnx.to_pure_dict(grads_of(params)))
  for _ in range(num_steps):
    params, batch_stats, opt_state, metrics = step_fn(
      params, batch_stats, other, opt_state, np.int32(0), batch
    )  # same mask every step
    losses.append(float(metrics["loss"]))
  return losses, grads


@pytest.mark.parametrize("mode", ["mask", "denoise"])
def test_loss_falls_on_a_fixed_batch_and_the_lcm_gets_gradients(files, mode):
  losses, grads = _losses_and_grads(files, mode)
  assert np.isfinite(losses).all() and losses[-1] < losses[0]
  for name in (
    "encoder/blocks/0/lcm/conv1/kernel",
    "encoder/blocks/0/lcm/conv2/kernel",
    "encoder/blocks/0/lcm/bn/scale",
  ):
    assert np.abs(np.asarray(grads[name])).max() > 0, name
  if mode == "mask":
    assert np.abs(np.asarray(grads["mask_token"])).max() > 0


def test_nonzero_pixels_are_weighted_up():
  loss = objectives.MaskedReconstructionLoss(mode="denoise", nonzero_weight=10.0, noise_relative_std=0.0)

  class Zero:  # predicts zeros everywhere
    patch_size = 5
    masking = nnx.Rngs(dropout=0)

    def __call__(self, images, token_mask):
      return jnp.zeros(models.patchify(images, 5).shape)

  images = jnp.zeros((1, 5, 5, 1)).at[0, 0, 0, 0].set(np.e - 1)  # one occupied pixel, log1p = 1
  value, metrics = loss(Zero(), {"image": images})
  assert float(value) == pytest.approx(10.0 / (10.0 + 24.0))
  assert float(metrics["occupied_pixel_mse"]) == pytest.approx(1.0)


def test_bridge_loads_the_mae_backbone(files, tmp_path):
  workdir = str(tmp_path / "mae")
  loop.train_and_evaluate(tiny_config("mae", unlabelled_path=files["unlabelled"], num_epochs=1), workdir)
  pretrained, meta = model_io.read_model_checkpoint(workdir)
  assert meta["task"] == "mae" and "mask_token" in pretrained["params"]
  model = recipes.build_task(tiny_config("finetune", files["labelled"], init_from=workdir)).model
  for name, value in flat_params(model).items():
    if name.split("/")[0] not in ("cls_head", "reg_head"):
      np.testing.assert_array_equal(value, pretrained["params"]["encoder/" + name])
