"""The built-in provider simulator (OpenAI, Anthropic and Gemini wire formats)."""

from workers.simulator.server import SimServer, start_in_thread
from workers.simulator.settings import SimSettings, sim_settings

__all__ = ["SimServer", "SimSettings", "sim_settings", "start_in_thread"]
