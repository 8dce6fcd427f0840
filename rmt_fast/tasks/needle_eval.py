"""The needle evaluation's first home, kept for the commands in ``docs/``:
``python -m rmt_fast.tasks.needle_eval ...`` runs :mod:`rmt_fast.tasks.length_eval` (whose task
defaults to ``needle``)."""

from rmt_fast.tasks.length_eval import main

if __name__ == "__main__":
    main()
