"""Tapping NNX layers by patching their ``__call__`` during a tapped pass.

NNX has no method interceptor (``Module.sow``/``perturb`` need the model's
code to call them). So while a tapped forward pass runs, :func:`tapped_calls`
replaces ``__call__`` of the tapped classes with a wrapper, and puts every
original back when the block exits, also when the model raises.

The wrapper only taps inside a tapped run of the current thread and context
(a ``ContextVar``); anywhere else it calls the original. The patch is
installed once however many runs are active (a count under a lock), so
concurrent or nested runs cannot leave a wrapper behind by saving another
run's wrapper as "the original".
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import threading
from typing import Any, Callable, Iterator

from flax import nnx

from kronjax.tape import LayerPath, Recorder

CLASSES = (nnx.Linear, nnx.LinearGeneral, nnx.Conv, nnx.Embed)
# The patched methods: every class's __call__, and the embedding's attend.
_METHODS = tuple((cls, "__call__") for cls in CLASSES) + ((nnx.Embed, "attend"),)

# on_call(path, module, tapped class, call, x) of the tapped run here, if any.
OnCall = Callable[[LayerPath, Any, type, Callable[[], Any], Any], Any]
_ACTIVE: contextvars.ContextVar[
    tuple[Recorder, dict[int, LayerPath], OnCall] | None] = (
        contextvars.ContextVar("kronjax_nnx_tap", default=None))
_LOCK = threading.Lock()
_installed: dict[str, Any] = {"count": 0, "originals": {}}


@contextlib.contextmanager
def tapped_calls(rec: Recorder, paths: dict[int, LayerPath],
                 on_call: OnCall) -> Iterator[None]:
  """Calls of tapped layers in this context go to ``on_call`` in the block.

  Args:
    rec: the recorder of this run.
    paths: ``{id(module): path}`` for the modules of the model being run.
    on_call: taps one call of a layer whose path is wanted.
  """
  token = _ACTIVE.set((rec, paths, on_call))
  try:
    _install()
    try:
      yield
    finally:
      _uninstall()
  finally:
    _ACTIVE.reset(token)


def _install() -> None:
  with _LOCK:
    if _installed["count"] == 0:
      originals = _installed["originals"]
      try:
        for cls, method in _METHODS:
          originals[cls, method] = cls.__dict__[method]
          setattr(cls, method, _tapping_call(cls, originals[cls, method],
                                             method))
      except BaseException:
        _restore(originals)
        raise
    _installed["count"] += 1


def _uninstall() -> None:
  with _LOCK:
    _installed["count"] -= 1
    if _installed["count"] == 0:
      _restore(_installed["originals"])


def _restore(originals: dict) -> None:
  for (cls, method), original in list(originals.items()):
    setattr(cls, method, original)
    del originals[cls, method]


def _tapping_call(cls: type, original: Callable[..., Any],
                  method: str) -> Callable:

  @functools.wraps(original)
  def __call__(module, *args, **kwargs):
    active = _ACTIVE.get()
    if active is None:
      return original(module, *args, **kwargs)
    rec, paths, on_call = active
    path = paths.get(id(module), getattr(module, _PATH, None))
    if path is None and rec.layers is None:
      # NNX transforms (nnx.scan, nnx.vmap, nnx.remat) run copies of the
      # modules, which have no path here: refuse rather than skip silently.
      rec.check_trace(f"An nnx.{type(module).__name__} layer")
    if path is None or not rec.wants(path, "nnx." + type(module).__name__):
      return original(module, *args, **kwargs)
    return on_call(path, module, "attend" if method == "attend" else cls,
                   lambda: original(module, *args, **kwargs),
                   args[0] if args else kwargs.get("inputs",
                                                   kwargs.get("query")))

  return __call__


_PATH, _PROBE = "_kronjax_path", "_kronjax_probe_"
_STATS = ("aa", "gg", "count")


def attach(module: Any, path: LayerPath, probe: dict | None) -> None:
  """Marks a layer of a model merged for one tapped run with its path and
  probe: copies of it made by NNX transforms (``nnx.scan``) keep both, the
  probe (``nnx.Param``s) sliced as the layer's own parameters are."""
  object.__setattr__(module, _PATH, path)
  if probe is not None:
    for name in _STATS:
      setattr(module, _PROBE + name, nnx.Param(probe[name]))


def probe(module: Any) -> dict | None:
  """The probe :func:`attach` gave ``module`` (or its copy), if any."""
  if not hasattr(module, _PROBE + "aa"):
    return None
  return {name: getattr(module, _PROBE + name)[...] for name in _STATS}
