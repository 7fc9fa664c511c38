"""Runs one experiment of experiments/:  python launch.py --experiment=NAME [flags]

    python launch.py --experiment=xray_light --k=5
    python launch.py --experiment=xray_compare --dataset=pneumonia_mnist --image_size=64
    python launch.py --experiment=mnist --method=light --k=3 --helpfull
    python launch.py --experiment=xray_light --config.model.k=5 --config.schedule.epochs=3

Each experiment is a config (configs/NAME.py, get_config()) plus a small main (experiments/NAME.py).
Every short flag is an alias of one config field (experiments/cli.py, ALIASES); --config.PATH=VALUE
sets any field; --helpfull (or --help full) lists them. Exit status (exit_codes() below): 2 with one line
for bad input (an unknown experiment, a wrong flag value, missing data, a damaged checkpoint or model
file, a workdir in use); 1 with one line for a non-finite training loss; 1 with a traceback for a bug
in lightflax; 130 with "interrupted; resume with --resume" on Ctrl-C (SIGINT) or SIGTERM (every
finished epoch is already checkpointed). README: "Errors and exit codes".
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def exit_codes():
    """The one table: error class -> (exit status, message or None for the error's own first line).
    The first matching row wins; anything else is a bug (a traceback, status 1)."""
    from lightflax import errors

    return ((KeyboardInterrupt, 130, INTERRUPTED),
            (errors.NonFiniteLossError, 1, None),
            (errors.UserError, 2, None))


def available() -> list:
    folder = os.path.join(HERE, "configs")
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
        if arg == "full" and i and argv[i - 1] == "--help":  # --help full: the long listing
            out[-1] = "--helpfull"
            continue
        out.append(arg)
    return out


def _die(message: str, code: int = 2) -> None:
    if code == 130:  # said here: the last-resort atexit check (see _guarded) stays quiet
        from lightflax import interrupts

        interrupts.reset()
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def _config_path(name: str) -> str:
    return os.path.join(HERE, "configs", f"{name}.py")


def define_flags(name: str) -> None:
    """--config (configs/NAME.py) and the short flags of its fields: defined once, here."""
    import importlib

    from absl import flags
    from ml_collections import config_flags

    from experiments import cli

    cli.define(importlib.import_module(f"configs.{name}").get_config(), flags.FLAGS)
    config_flags.DEFINE_config_file("config", default=_config_path(name), help_string=(
        "The experiment's config file; --config.PATH=VALUE overrides a field."))
    # --help names the default as the repository's file, not by this checkout's absolute path.
    flags.FLAGS["config"].default_as_str = repr(f"configs/{name}.py")


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

    try:
        define_flags(name)
    except flags.Error as e:  # a bad --config.PATH=VALUE is parsed while the config flag is defined
        _die(str(e).splitlines()[0])
    module = importlib.import_module(f"experiments.{name}")
    from lightflax import interrupts

    interrupts.check()  # a signal during the imports was only recorded (lightflax/interrupts.py)

    def parse(args):
        try:
            return flags.FLAGS(args)
        except flags.Error as e:
            _die(str(e).splitlines()[0])

    app.run(lambda args: _run(module, argv), argv=_strip_experiment(argv), flags_parser=parse)


def _run(module, argv) -> None:
    from absl import flags, logging

    from experiments import cli
    from lightflax import interrupts

    # Library INFO logs (Orbax, TFDS writers) are noise here; --verbosity=0 brings them back.
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    table = exit_codes()
    try:
        config, explicit = cli.apply(flags.FLAGS.config, argv[1:])
        cli.check(config)
        module.main(config, explicit)
        interrupts.check()  # a signal recorded where it could not be raised ends 130, never 0
    except tuple(cls for cls, _, _ in table) as e:
        code, message = next((code, message) for cls, code, message in table if isinstance(e, cls))
        _die(message or str(e).splitlines()[0], code=code)


INTERRUPTED = "interrupted; resume with --resume"


def _guarded(argv) -> None:
    """main(argv), with Ctrl-C/SIGTERM at any moment (flag parsing, imports, shutdown) ending 130:
    lightflax/interrupts.py records the signal, raises it at a safe point, never loses it."""
    import atexit

    from lightflax import interrupts

    def last_word():  # registered first, so it runs after every other atexit function
        if interrupts.pending() is not None:
            print(f"error: {INTERRUPTED}", file=sys.stderr, flush=True)
            os._exit(130)

    atexit.register(last_word)
    try:
        main(argv)
    except KeyboardInterrupt:
        _die(INTERRUPTED, code=130)
    except SystemExit as e:
        if e.code in (None, 0) and interrupts.pending() is not None:
            _die(INTERRUPTED, code=130)
        raise


def _start() -> None:
    """The first steps, before JAX starts: the handler, then the one re-execution (the large-block
    reuse layer under malloc, lightflax/reuse_alloc.py, and with LIGHTFLAX_HUGE_PAGES=1 huge pages:
    both only at process start; lightflax/startup.py). SIGINT/SIGTERM stay blocked until both are
    done: a signal during the first imports waits for the handler, and one during the re-execution
    stays pending across the exec (a handled one would be lost with the old process), so it reaches
    the new process's handler when that unblocks them."""
    import signal

    held = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, held)
    from lightflax import interrupts, startup

    interrupts.install()  # Ctrl-C and SIGTERM end 130 from here on
    startup.reexec_if_useful()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, held)  # a pending signal is handled here


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    try:
        _start()
    except KeyboardInterrupt:
        _die(INTERRUPTED, code=130)
    _guarded(sys.argv)
