"""Sweeps: planning (grid.py), launching (launch.py) and summarizing (summary.py) many runs."""
