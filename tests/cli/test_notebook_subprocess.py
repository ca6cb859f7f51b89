"""A notebook, as TPU users run one: progress shows in the cell output (the kernel's stderr is no terminal),
and `!mixtral-jax ...` works from a kernel that has initialized JAX with libtpu and no JAX_PLATFORMS."""

import os
import sys

import nbformat
from nbclient import NotebookClient

from mixtral_jax import MixtralConfig
from tests.helpers import REPO_ROOT


def test_notebook_shows_progress_and_runs_the_cli(reference, tmp_path):
    ref = reference(MixtralConfig.tiny(), 0)
    exe = os.path.join(os.path.dirname(sys.executable), "mixtral-jax")
    ck, hf = str(tmp_path / "ck"), str(tmp_path / "hf")
    cells = [
        "import os\nos.environ.pop('JAX_PLATFORMS', None)\nos.environ['MIXTRAL_JAX_PROGRESS_INTERVAL'] = '0'\n"
        "import jax\nprint(jax.devices())",
        f"from mixtral_jax.convert import convert\nprint(convert({ref.path!r}, {ck!r}))",
        f"!{exe} export {ck} {hf} --format hf",
    ]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": REPO_ROOT}}).execute()
    outputs = [[o.get("text", "") for o in cell.outputs] for cell in nb.cells]
    assert not [o for cell in nb.cells for o in cell.outputs if o.output_type == "error"]
    assert "CpuDevice" in "".join(outputs[0])
    library = "".join(outputs[1])
    assert "converting" in library and "23/23 tensors (100%)" in library and "converted 65 tensors" in library
    shell = "".join(outputs[2])
    assert "coordinator_address" not in shell
    assert "exporting: 0/65 tensors" in shell and "exporting: 65/65 tensors (100%)" in shell, shell
    assert os.path.isfile(os.path.join(hf, "model.safetensors"))
