"""Simulated instruments behind `edge-agent simulate`: a Modbus slave (`slave`), instruments built from
register maps (`instruments`) and the command's entry point (`serve.serve(config)`).

Imports nothing from `agent` but `agent.model` (through the drivers modules).
"""
