"""The experiment scripts; run them as modules from the repository root.

python -m experiments.limits --quick
python -m experiments.compare --quick
"""
