"""The README's Python blocks run as pasted and print what their comments promise."""

import contextlib
import io
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
PROMISED_SIZE = re.compile(r"torch\.Size\(\[[0-9, ]*\]\)")


def promised_sizes(block: str) -> list[str]:
    """The ``torch.Size([...])`` values named in the comments of the block's print lines."""
    return [size for line in block.splitlines() if line.startswith("print(") for size in PROMISED_SIZE.findall(line)]


def test_readme_has_python_blocks_that_promise_output():
    assert len(BLOCKS) >= 2
    assert all(promised_sizes(block) for block in BLOCKS)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs_and_prints_what_it_promises(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks may write files (explain.png)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(BLOCKS[index], f"README.md block {index}", "exec"), {"__name__": "__readme__"})
    output = printed.getvalue()
    for size in promised_sizes(BLOCKS[index]):
        assert size in output, f"README block {index} promises {size}; it printed:\n{output}"
