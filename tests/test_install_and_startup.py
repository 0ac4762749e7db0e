"""The light install (no triton) and the first call: what gets imported, and the errors."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_without_triton_the_torch_path_works_and_triton_requests_name_the_extra():
    out = _run(
        """
        import sys
        sys.modules["triton"] = None  # as if triton were not installed: importing it fails
        import torch
        import brnpa_triton as bt

        x = torch.rand(2, 3, 4, 4, requires_grad=True)
        bt.brnpa(x, 2).vectors.sum().backward()
        assert bt.available_backends("cpu") == ["torch"], bt.available_backends("cpu")
        for call in (lambda: bt.brnpa(x, 2, backend="triton"),
                     lambda: torch.ops.brnpa_triton.forward(x.detach().flatten(2), 2, True,
                                                            torch.empty(0, dtype=torch.int64), False, "triton")):
            try:
                call()
            except RuntimeError as e:
                assert "pip install 'brnpa-triton[triton]'" in str(e) and "backend='torch'" in str(e), e
            else:
                raise AssertionError("backend='triton' ran without triton")
        print("ok")
        """
    )
    assert out.strip() == "ok"


def test_first_eager_call_imports_neither_dynamo_nor_triton():
    """torch.library.custom_op would import torch._dynamo (and sympy, triton: seconds) on the
    first call; an eager forward + backward must not."""
    out = _run(
        """
        import sys
        import torch
        import brnpa_triton as bt

        x = torch.rand(2, 3, 4, 4, requires_grad=True)
        out = bt.brnpa(x, 2, order="activity")
        (out.vectors.sum() + out.maps.sum() + out.norms.sum()).backward()
        bt.BRNPAHead(3, 5, 2)(torch.rand(2, 7, 3)).sum().backward()
        print(sorted(m for m in ("torch._dynamo", "triton", "sympy") if m in sys.modules))
        """
    )
    assert out.strip() == "[]"
