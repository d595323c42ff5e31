"""Training: the program (state, step, shardings: program.py), the loop around it (loop.py), its
metrics (metrics.py), what it survives (faults.py) and the memory planner (plan.py)."""
