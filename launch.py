"""Runs one experiment of experiments/:  python launch.py --experiment=NAME [flags]

    python launch.py --experiment=xray_light --k=5
    python launch.py --experiment=xray_compare --dataset=pneumonia_mnist --image_size=64
    python launch.py --experiment=mnist --method=light --k=3 --helpfull

Only the named experiment's module is imported (absl flags are global). Exit
status: 2 with one line for bad input (an unknown experiment, a wrong flag value,
missing data, a damaged checkpoint or model file, a workdir in use); 1 with one line
for a non-finite training loss; 1 with a traceback for a bug in lightflax; 130 with
"interrupted; resume with --resume" on Ctrl-C (SIGINT) or SIGTERM (every finished
epoch is already checkpointed). README: "Errors and exit codes".
"""

import os
import signal
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def available() -> list:
    folder = os.path.join(HERE, "experiments")
    return sorted(f[:-3] for f in os.listdir(folder) if f.endswith(".py") and not f.startswith("_"))


def _experiment_name(argv) -> str:
    for i, arg in enumerate(argv[1:], start=1):
        if arg.startswith("--experiment="):
            return arg.split("=", 1)[1]
        if arg == "--experiment" and i + 1 < len(argv):
            return argv[i + 1]
    return ""


def _strip_experiment(argv) -> list:
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg.startswith("--experiment="):
            continue
        if arg == "--experiment":
            skip = True
            continue
        out.append(arg)
    return out


def _die(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def main(argv) -> None:
    names = available()
    name = _experiment_name(argv)
    if not name:
        if any(a in ("--help", "--helpfull", "--helpshort", "-h") for a in argv[1:]):
            print(__doc__)
            print("experiments: " + ", ".join(names))
            sys.exit(0)
        _die(f"--experiment is required; available: {', '.join(names)}")
    if name not in names:
        _die(f"unknown experiment {name!r}; available: {', '.join(names)}")
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    import importlib

    from absl import app, flags

    from lightflax.errors import UserError

    module = importlib.import_module(f"experiments.{name}")

    def parse(args):
        try:
            return flags.FLAGS(args)
        except flags.Error as e:
            _die(str(e).splitlines()[0])

    def run(args):
        # Library INFO logs (Orbax, TFDS writers) are noise here; --verbosity=0 brings them back.
        if not flags.FLAGS["verbosity"].present:
            from absl import logging

            logging.set_verbosity(logging.WARNING)
        try:
            _check_flags()
            module.main(args)
        except KeyboardInterrupt:
            _die("interrupted; resume with --resume", code=130)
        except UserError as e:
            _die(str(e).splitlines()[0])
        except Exception as e:  # noqa: BLE001 - one named class of run failure
            from lightflax.errors import NonFiniteLossError

            if isinstance(e, NonFiniteLossError):
                _die(str(e).splitlines()[0], code=1)
            raise

    signal.signal(signal.SIGTERM, _interrupt)  # a polite kill ends like Ctrl-C
    app.run(run, argv=_strip_experiment(argv), flags_parser=parse)


def _check_flags() -> None:
    """Flags that data loading reads before the RunConfig checks them (--seed, --image_size, ...)."""
    from absl import flags

    from lightflax.config import check_flag_values

    names = ("seed", "image_size", "eval_image_size", "learning_rate")
    check_flag_values(**{n: flags.FLAGS[n].value for n in names if n in flags.FLAGS})


def _interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    # First, before JAX starts: with LIGHTFLAX_HUGE_PAGES=1, large allocations on transparent huge
    # pages (lightflax/huge_pages.py; glibc reads that only at process start: the same command is
    # re-executed once).
    sys.path.insert(0, HERE)
    from lightflax import huge_pages

    huge_pages.reexec_if_useful()
    main(sys.argv)
