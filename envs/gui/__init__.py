"""SecAgent: a GUI agent with a semantic context, in a real browser (MiniWoB++ in headless Chromium), with
AndroidLens-style step and milestone evaluation (docs/gui.md).

A plugin (`plugins: [envs.gui]`): importing it registers the `miniwob` environment (`env`), the `secagent`
prompt builder (`secagent`), the `secagent` and `miniwob_task` rewards (`rewards`) and the `gui_static` /
`gui_live` metric sets (`metrics`). Data: `python -m envs.gui record` (the DOM oracle's expert episodes with
every valid action) and `python -m envs.gui build` (SFT, grounding and static-benchmark rows).
The browser is Debian's chromium + chromium-driver (`make browser`); miniwob is the `gui` extra.
"""

from envs.gui import env, live, metrics, rewards, secagent  # noqa: F401  (registrations)
