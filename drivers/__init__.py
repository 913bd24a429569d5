"""Instrument drivers: turn bytes on a wire (or a simulation) into `agent.model.Reading`s.

Drivers import nothing from `agent` but `agent.model` (and the pure HJ 212 codec `agent.hj212`).
"""
