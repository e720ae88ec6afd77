"""The look of the plots is chosen in our code (``plots.set_style``), never by what is installed.

Matplotlib's defaults unless the CMS style of mplhep (the ``hep`` extra) is asked for: the same figure
is the same PNG whether or not mplhep can be imported, and whatever rcParams were set globally.
"""

import os
import subprocess
import sys

import matplotlib
import numpy as np
import pytest

from l2vit_jax import errors
from l2vit_jax.evaluation import plots

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Draws one ROC figure to argv[1]; argv[2] == "block" makes `import mplhep` fail first.
DRAW = (
  "import sys\n"
  "if sys.argv[2] == 'block':\n"
  "  sys.modules['mplhep'] = None\n"
  "import numpy as np\n"
  "from l2vit_jax.evaluation import plots\n"
  "labels = np.arange(40) % 2\n"
  "scores = np.linspace(0, 1, 40) ** 2 * (0.5 + labels)\n"
  "plots.plot_roc({'net': (labels, scores)}, sys.argv[1])\n"
)


@pytest.fixture(autouse=True)
def default_style():
  plots.set_style("matplotlib")
  yield
  plots.set_style("matplotlib")


def _draw(path, mplhep: str) -> bytes:
  env = {k: v for k, v in os.environ.items() if k != plots.STYLE_VARIABLE}
  subprocess.run([sys.executable, "-c", DRAW, str(path), mplhep], check=True, timeout=300, env=env, cwd=REPO)
  with open(path, "rb") as f:
    return f.read()


def test_a_figure_is_the_same_png_with_and_without_mplhep(tmp_path):
  pytest.importorskip("mplhep", reason="needs the hep extra to compare with: pip install -e '.[hep]'")
  assert _draw(tmp_path / "with.png", "allow") == _draw(tmp_path / "without.png", "block")


def test_the_default_style_ignores_rcparams_set_globally(monkeypatch):
  monkeypatch.setitem(matplotlib.rcParams, "font.size", 31.0)
  monkeypatch.setitem(matplotlib.rcParams, "axes.grid", True)
  with plots._style():  # pylint: disable=protected-access
    assert matplotlib.rcParams["font.size"] == matplotlib.rcParamsDefault["font.size"]
    assert matplotlib.rcParams["axes.grid"] is False
  assert matplotlib.rcParams["font.size"] == 31.0


def test_the_cms_style_applies_only_when_asked_for():
  mplhep = pytest.importorskip("mplhep", reason="needs the hep extra: pip install -e '.[hep]'")
  cms_size = float(mplhep.style.CMS["font.size"])
  assert cms_size != matplotlib.rcParamsDefault["font.size"]
  with plots._style():  # pylint: disable=protected-access
    assert float(matplotlib.rcParams["font.size"]) != cms_size
  plots.set_style("cms")
  with plots._style():  # pylint: disable=protected-access
    assert float(matplotlib.rcParams["font.size"]) == cms_size


def test_the_cms_style_without_mplhep_is_a_one_line_config_error(monkeypatch):
  monkeypatch.setitem(sys.modules, "mplhep", None)  # `import mplhep` raises ImportError
  with pytest.raises(errors.ConfigError, match=r"needs mplhep: pip install -e \"\.\[hep\]\"") as refused:
    plots.set_style("cms")
  assert "\n" not in str(refused.value)


def test_an_unknown_style_is_a_config_error_naming_the_choices(tmp_path, monkeypatch):
  with pytest.raises(errors.ConfigError, match="use one of"):
    plots.set_style("seaborn")
  monkeypatch.setattr(plots, "_chosen_style", "seaborn")  # as L2VIT_PLOT_STYLE=seaborn would set it
  with pytest.raises(errors.ConfigError, match="L2VIT_PLOT_STYLE"):
    plots.plot_confusion_matrix(np.array([0, 1]), np.array([0.2, 0.7]), tmp_path / "cm.png")
