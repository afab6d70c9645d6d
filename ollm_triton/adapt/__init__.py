"""Run-time adaptation: a controller that switches strategies live (`+adapt=...`; adapt/base.py is the contract)."""
