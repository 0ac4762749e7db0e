"""`python -m brnpa_triton`: the end-to-end demo (see brnpa_triton.demo; `--help` for its options).
`python -m brnpa_triton --self-check`: which backends run here, and a quick correctness check."""

from __future__ import annotations

import sys
import time

import torch

import brnpa_triton as bt


def _check_backend(features: torch.Tensor, backend: str) -> list[str]:
    """Defining properties of the operator, and the closed-form backward against finite differences."""
    problems = []
    out = bt.brnpa(features, 3, backend=backend)
    x = features.flatten(2)  # (B, C, N)
    if not torch.allclose(out.maps.sum((2, 3)), torch.ones_like(out.activity)):
        problems.append("maps do not sum to 1")
    if not torch.allclose(out.vectors, torch.einsum("bkn,bcn->bkc", out.maps.flatten(2), x)):
        problems.append("vectors are not the map-weighted features")
    if not torch.equal(out.indices[:, 0], out.norms.flatten(1).argmax(1)):
        problems.append("part 0 is not seeded at the highest-norm position")
    small = features[:1, :4, :3, :3].detach().clone().requires_grad_()
    if not torch.autograd.gradcheck(lambda f: bt.brnpa(f, 2, backend=backend)[:2], (small,), raise_exception=False):
        problems.append("backward disagrees with finite differences")
    return problems


def self_check() -> int:
    print(f"brnpa_triton {bt.__version__}  torch {torch.__version__}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    failed = False
    for device in devices:
        backends = bt.available_backends(device)
        print(f"{device}: backends available: {', '.join(backends)}")
        features = torch.rand(2, 16, 7, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        for backend in backends:
            if device == "cpu" and backend == "triton":
                print("  triton: runs on CPU only under the interpreter (tests); skipped here")
                continue
            start = time.perf_counter()
            problems = _check_backend(features.to(device), backend)
            elapsed = time.perf_counter() - start
            failed |= bool(problems)
            print(f"  {backend}: {'ok' if not problems else 'FAILED: ' + '; '.join(problems)} ({elapsed:.2f} s)")
    return 1 if failed else 0


SELF_CHECK_HELP = """
other mode: python -m brnpa_triton --self-check
  --self-check          check the operator instead of running the demo: which backends run here,
                        and a quick correctness check of each (takes no other argument)"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        from brnpa_triton.demo import main as demo_main

        try:
            demo_main(["--help"])  # the demo's options (argparse prints them and exits)
        except SystemExit:
            pass
        print(SELF_CHECK_HELP)
        raise SystemExit(0)  # as argparse's --help does
    if "--self-check" in argv:
        if len(argv) != 1:
            print("usage: python -m brnpa_triton --self-check (takes no other argument)", file=sys.stderr)
            return 2
        return self_check()
    from brnpa_triton.demo import main as demo_main  # its optional packages are imported when it runs

    try:
        demo_main(argv)
    except ImportError as e:
        print(f"the demo needs the 'demo' extra: pip install 'brnpa-triton[demo]' ({e})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
