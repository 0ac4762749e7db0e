"""`python -m brnpa_triton`: the end-to-end demo (brnpa_triton.demo), or with `--self-check`, which
backends run here and a quick correctness check of each. `--help` lists every option."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch

import brnpa_triton as bt
from brnpa_triton.dispatch import triton_installed, triton_interpreter_enabled

DESCRIPTION = ("The end-to-end demo: a small CNN with the BR-NPA head trained on cluttered handwritten digits, "
               "its explanations scored against CAM methods (needs the 'demo' extra).")


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


TRITON_NOT_INSTALLED = "triton is not installed (pip install 'brnpa-triton[triton]'; CUDA builds of PyTorch include it)"


def triton_status() -> tuple[str | None, str]:
    """(triton's version, "triton <version>"), or (None, why it cannot be used)."""
    if not triton_installed():
        return None, TRITON_NOT_INSTALLED
    try:
        import triton
    except Exception as e:  # noqa: BLE001 - a broken install is reported, not raised
        return None, f"triton is installed but does not import ({type(e).__name__}: {e})"
    return triton.__version__, f"triton {triton.__version__}"


def _triton_skip_reason(device: str, triton_version: str | None, status: str) -> str | None:
    """Why the triton backend is not checked on ``device`` (None: it is checked)."""
    if triton_version is None:
        return status
    if device == "cpu":
        if triton_interpreter_enabled():
            return "the interpreter (TRITON_INTERPRET=1) is for tests, far too slow for this check"
        return "the fused kernels run on CUDA tensors (on CPU only under TRITON_INTERPRET=1, for tests)"
    return None


def self_check() -> int:
    version, triton_line = triton_status()
    print(f"brnpa_triton {bt.__version__}  torch {torch.__version__}  {triton_line}")
    cuda = torch.cuda.is_available()
    devices = ["cpu"] + (["cuda"] if cuda else [])
    failed = False
    features = torch.rand(2, 16, 7, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for device in devices:
        backends = bt.available_backends(device)
        print(f"{device}: backends available: {', '.join(backends)}")
        for backend in ("torch", "triton"):
            skipped = _triton_skip_reason(device, version, triton_line) if backend == "triton" else None
            if skipped:
                print(f"  triton: skipped on {device}: {skipped}")
                continue
            start = time.perf_counter()
            problems = _check_backend(features.to(device), backend)
            elapsed = time.perf_counter() - start
            failed |= bool(problems)
            print(f"  {backend}: {'ok' if not problems else 'FAILED: ' + '; '.join(problems)} ({elapsed:.2f} s)")
    if not cuda:
        print("cuda: skipped: no CUDA device (torch.cuda.is_available() is False), so the triton kernels were "
              "not checked")
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    """Every option of ``python -m brnpa_triton``; the demo's defaults come from ``DemoConfig``."""
    from brnpa_triton.demo import DemoConfig

    d = DemoConfig()
    p = argparse.ArgumentParser(prog="python -m brnpa_triton", description=DESCRIPTION,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--self-check", action="store_true",
                   help="instead of the demo: which backends run here (triton named with its version, or why its "
                        "check is skipped) and a quick correctness check of each; takes no other option")
    demo = p.add_argument_group("demo options")
    demo.add_argument("--out", default=d.out, help="output directory (overlays.png, results.json, model.pt)")
    demo.add_argument("--seeds", type=int, nargs="+", default=list(d.seeds), help="training seeds, one model each")
    demo.add_argument("--epochs", type=int, default=d.epochs, help="training epochs per seed")
    demo.add_argument("--num-parts", type=int, default=d.num_parts, help="parts K of the model's BR-NPA head")
    demo.add_argument("--eval-images", type=int, default=d.eval_images,
                      help="test images whose explanations are scored (the same for every method)")
    demo.add_argument("--di-step", type=int, default=d.di_step, help="feature-map cells per deletion/insertion step")
    demo.add_argument("--rise-masks", type=int, default=d.rise_masks, help="random masks RISE averages per image")
    demo.add_argument("--threads", type=int, default=d.threads, help="torch threads (None: torch's choice)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--self-check" in argv and len(argv) != 1:
        print("usage: python -m brnpa_triton --self-check (takes no other argument)", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)  # --help prints and exits 0
    if args.self_check:
        return self_check()
    from brnpa_triton.demo import DemoConfig, run_demo  # its optional packages are imported when it runs

    config = dataclasses.replace(
        DemoConfig(), out=args.out, seeds=tuple(args.seeds), epochs=args.epochs, num_parts=args.num_parts,
        eval_images=args.eval_images, di_step=args.di_step, rise_masks=args.rise_masks, threads=args.threads,
        progress=not args.no_progress,
    )
    try:
        run_demo(config)
    except ImportError as e:
        print(f"the demo needs the 'demo' extra: pip install 'brnpa-triton[demo]' ({e})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
