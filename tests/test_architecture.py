"""The code's shape, checked: small modules, small factories, one name in one
place, and a train step that runs code from few files.

These hold the core redesign in place (one job per module, keyword-only
options, no helper written twice).
"""

import ast
import doctest
import importlib
import inspect
import os
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest

import kronjax
import kronjax.flax

ROOT = pathlib.Path(kronjax.__file__).parent
MODULES = sorted(p for p in ROOT.rglob("*.py"))


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_module_is_over_400_lines():
  long = {str(p.relative_to(ROOT)): n for p in MODULES
          if (n := len(p.read_text().splitlines())) > 400}
  assert not long, long


@pytest.mark.parametrize("factory", [kronjax.kfac, kronjax.scale_by_kfac,
                                     kronjax.scale_by_adaptive_kfac])
def test_factories_take_at_most_twelve_mostly_keyword_only_options(factory):
  params = inspect.signature(factory).parameters.values()
  # Eleven options (EK-FAC's eigenvalue_correction the last added) and the
  # layers; the next option should merge exact_damping and
  # eigenvalue_correction into one choice of solve.
  assert len(params) <= 12
  positional = [p for p in params if p.kind is not p.KEYWORD_ONLY]
  assert len(positional) == 1, positional


def test_no_private_helper_is_defined_in_two_modules():
  where = {}
  for path in MODULES:
    for node in ast.parse(path.read_text()).body:
      if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and (
          node.name.startswith("_") and not node.name.startswith("__")):
        where.setdefault(node.name, []).append(str(path.relative_to(ROOT)))
  twice = {name: files for name, files in where.items() if len(files) > 1}
  assert not twice, twice


def _doctest(name: str) -> doctest.TestResults:
  with jax.enable_x64(False):  # as users run them (the suite turns it on)
    return doctest.testmod(importlib.import_module(name),
                           optionflags=doctest.ELLIPSIS)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_doctests_pass(path):
  assert _doctest(_module_name(path)).failed == 0


def test_the_documented_examples_are_run():
  attempted = {name: _doctest(name).attempted
               for name in ("kronjax.linalg._kron", "kronjax.transform")}
  assert all(attempted.values()), attempted


class _Mlp(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(10)(jnp.tanh(nn.Dense(32)(nn.Conv(4, (3,))(x)).mean(1)))


def test_an_adaptive_train_step_runs_code_from_at_most_thirteen_files():
  model, loss = _Mlp(), kronjax.losses.softmax_cross_entropy
  x, y = jnp.ones((8, 5, 3)), jnp.arange(8) % 10
  params = model.init(jax.random.key(0), x)["params"]
  tape_fn = kronjax.flax.value_grad_and_tape(model, loss)
  tx = kronjax.kfac(loss=loss)

  def train_step(params, state, rng):
    value, grads, tape = tape_fn(params, x, y, rng)
    updates, state = tx.update(
        grads, state, params, curvature=tape, value=value, targets=y,
        output_fn=lambda p: model.apply({"params": p}, x))
    return optax.apply_updates(params, updates), state

  files = set()

  def record(frame, event, arg):
    del arg
    name = frame.f_code.co_filename
    if event == "call" and name.startswith(str(ROOT)):
      files.add(os.path.relpath(name, ROOT))

  state = tx.init(params)
  sys.setprofile(record)
  try:
    jax.make_jaxpr(train_step)(params, state, jax.random.key(1))
  finally:
    sys.setprofile(None)
  # 11: the tape's batch (_batch.py); 12: whole-tree reductions compiled as
  # one operation (_trees.py); 13: every layer's damping and π at once
  # (_damping.py, out of _factors.py when EK-FAC took it over 400 lines).
  # EK-FAC's _ekfac.py runs only when it is asked for.
  assert len(files) <= 13, sorted(files)
