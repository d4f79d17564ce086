"""python -m tools.bench SUBCOMMAND [options]: benchmarks of hylo_jax, one subcommand each.

Every subcommand times with the same harness (tools/bench/harness.py) and reports the same
way: rows printed, and with --json / --markdown a JSON file and markdown table rows under
a line naming the command, device, commit and date. `python -m tools.bench SUBCOMMAND
--help` says what each one measures and how.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name: (module, one line). A module is imported only when its subcommand runs, so one
# subcommand's dependencies never stop another.
SUBCOMMANDS = {
    "kernels": ("tools.bench.kernels", "time the GDN and SSD kernels (Pallas, XLA, fla, mamba_ssm) on one device"),
    "import": ("tools.bench.import_model", "import speed and peak host memory of hylo_jax.load_model"),
    "compile": ("tools.bench.compile_time", "compile time of the distillation train steps and their parts"),
    "resources": ("tools.bench.resources", "registers, spills and shared memory of each Pallas GPU kernel, offline"),
    "prefill": ("tools.bench.prefill", "long prefill: cache bytes, compiled peak memory and time per token, teacher and student"),
    "ncu": ("tools.bench.ncu", "Nsight Compute counters of each GPU kernel of one GDN fwd+bwd (GPU only)"),
}


def parser_for(name):
    """(the subcommand's module, its argument parser)."""
    module = importlib.import_module(SUBCOMMANDS[name][0])
    p = argparse.ArgumentParser(prog=f"python -m tools.bench {name}", description=module.__doc__,
                                epilog=getattr(module, "EPILOG", None),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(p)
    return module, p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in SUBCOMMANDS:
        top = argparse.ArgumentParser(
            prog="python -m tools.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
            epilog="subcommands:\n" + "\n".join(f"  {name:10s} {line}" for name, (_, line) in SUBCOMMANDS.items()))
        top.add_argument("subcommand", choices=list(SUBCOMMANDS))
        top.add_argument("options", nargs=argparse.REMAINDER, help="the subcommand's; see its --help")
        top.parse_args(argv)  # prints the help, or the error for an unknown subcommand, and exits
    module, p = parser_for(argv[0])
    module.run(p.parse_args(argv[1:]))


if __name__ == "__main__":
    main()
