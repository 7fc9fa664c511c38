"""One config file per experiment of experiments/ (``python launch.py --experiment=NAME`` loads
``configs/NAME.py``): ``get_config()`` returns the experiment's ``ml_collections.ConfigDict``;
``--config.section.field=value`` overrides a field and the short flags (``--k``, ``--epochs``, ...)
are aliases of fields (experiments/cli.py, ALIASES). experiments/plan.py turns a config into a run
plan."""
