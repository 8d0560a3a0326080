"""After the trials: the registry side, reading what trials wrote.

versions.py  a feasible trial's adapter as a version of the registered model, with its tags
models.py    model URIs to adapters, PET models, ASE calculators and exported files
verify.py    re-evaluate a version before it may become champion
promote.py   rank a study's versions, verify the best, move the `champion` alias
export.py    a version merged into its base, in metatomic's format for MD

`python -m sweeper.promote` and `python -m sweeper.export` run the last two.
"""
