"""The kernel sections: a float32 matmul (the machine's practical FLOP/s peak), every depthwise
convolution formulation on the LCM's case, and linear against softmax attention by token count.

Single implementations, no reference: each figure is the minimum over repeats (``timing.best_time``),
after a compile and a first run.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from l2vit_jax.bench import timing
from l2vit_jax.models import attention, depthwise


def bench_matmul(args) -> dict:
  """A 10000×256×1024 float32 matmul (1000×… with ``--tiny``)."""
  m, k, n = (1000, 256, 1024) if args.tiny else (10000, 256, 1024)
  a = jax.random.normal(jax.random.key(0), (m, k), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (k, n), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  matmul(a, b).block_until_ready()
  seconds = timing.best_time(lambda: matmul(a, b).block_until_ready(), 5 if args.tiny else 10)
  return {"shape": [m, k, n], "seconds": seconds, "flop_per_s": 2 * m * k * n / seconds}


def bench_depthwise(args) -> dict:
  """Forward and gradient ms of every ``depthwise_conv2d`` formulation on (batch, grid, grid, dim), 7×7.

  The 'patches' formulation is skipped where its patch tensor exceeds ``--max-patch-mib``: its
  gradient holds several copies of the 49× tensor; at full size the process was killed for memory on
  a 23 GB machine.
  """
  grid = args.img_size // args.patch_size
  shape = (args.batch, grid, grid, args.embed_dim)
  x = jax.random.normal(jax.random.key(0), shape, jnp.float32)
  kernel = 0.1 * jax.random.normal(jax.random.key(1), (7, 7, 1, args.embed_dim), jnp.float32)
  weights = jnp.cos(x)  # a non-trivial output cotangent
  results = {
    "shape": list(shape),
    "kernel": [7, 7],
    "auto_resolves_to": depthwise.resolve_implementation("auto"),
    "implementations": {},
  }
  patch_bytes = 4 * int(np.prod(shape)) * 49
  for name in depthwise.IMPLEMENTATIONS[1:]:
    if name == "patches" and patch_bytes > args.max_patch_mib * 2**20:
      results["implementations"][name] = {
        "skipped": f"patch tensor {patch_bytes / 2**20:.0f} MiB > --max-patch-mib={args.max_patch_mib}"
      }
      continue
    conv = lambda x, k, name=name: depthwise.depthwise_conv2d(x, k, None, implementation=name)
    forward = jax.jit(conv)
    gradient = jax.jit(jax.grad(lambda x, k, conv=conv: jnp.sum(conv(x, k) * weights), argnums=(0, 1)))
    start = time.perf_counter()
    forward_compiled = forward.lower(x, kernel).compile()
    gradient_compiled = gradient.lower(x, kernel).compile()
    compile_seconds = time.perf_counter() - start
    forward_compiled(x, kernel).block_until_ready()
    jax.block_until_ready(gradient_compiled(x, kernel))
    slow = name in ("lax", "channel_batched")  # ≈1 s per call at full size: fewer repeats
    repeats = 2 if slow else 5
    run_forward = lambda f=forward_compiled: f(x, kernel).block_until_ready()
    run_gradient = lambda g=gradient_compiled: jax.block_until_ready(g(x, kernel))
    results["implementations"][name] = {
      "forward_ms": 1e3 * timing.best_time(run_forward, repeats),
      "gradient_ms": 1e3 * timing.best_time(run_gradient, repeats),
      "compile_seconds": compile_seconds,
    }
  return results


def bench_attention(args) -> dict:
  """Linear vs softmax attention kernels alone (batch 1, the model's heads) at ``--attention-tokens``,
  and the first token count at which softmax is slower (None if it never is in the measured range)."""
  heads, head_dim = args.num_heads, args.embed_dim // args.num_heads
  temperature = jnp.full((heads, 1, 1), head_dim**-0.5, jnp.float32)
  rows = []
  for tokens in (int(t) for t in args.attention_tokens.split(",")):
    keys = jax.random.split(jax.random.key(tokens), 3)
    q, k, v = (jax.random.normal(key, (1, heads, tokens, head_dim), jnp.float32) for key in keys)
    row = {"tokens": tokens}
    for kind, fn in (("linear", attention.linear_attention), ("softmax", attention.softmax_attention)):
      compiled = jax.jit(fn).lower(q, k, v, temperature).compile()
      compiled(q, k, v, temperature).block_until_ready()
      run = lambda c=compiled, q=q, k=k, v=v: c(q, k, v, temperature).block_until_ready()
      row[f"{kind}_ms"] = 1e3 * timing.best_time(run, 3)
    row["softmax_over_linear"] = row["softmax_ms"] / row["linear_ms"]
    rows.append(row)
  slower = [r["tokens"] for r in rows if r["softmax_ms"] > r["linear_ms"]]
  return {
    "batch": 1,
    "heads": heads,
    "head_dim": head_dim,
    "forward": rows,
    "softmax_slower_from_tokens": slower[0] if slower else None,
  }
