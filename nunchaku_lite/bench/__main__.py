"""python -m nunchaku_lite.bench kernels [--quick] [--block-m 64|128] [--json PATH] | smoke | model ..."""
import sys

from . import kernels


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print("  kernels  time the W4A4 kernels at FLUX shapes (table + JSON)")
        print("  smoke    small odd-shaped run of every kernel (for compute-sanitizer)")
        print("  model    full-size FLUX with random weights: 16-bit vs W4A4 step time, memory modes (table + JSON)")
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "kernels":
        return kernels.main(rest)
    if cmd == "smoke":
        return kernels.smoke(rest)
    if cmd == "model":
        from . import model
        return model.main(rest)
    print(f"unknown benchmark {cmd!r}; expected 'kernels', 'smoke' or 'model'", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
