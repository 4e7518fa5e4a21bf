"""Papers: one package per paper (`envs/<paper>/`), each registering its environment, rewards,
datasets and leaderboard metrics when a recipe names it in `plugins:`. See envs/README.md for the
environment protocol (`agents/environment.py`) and how to write a new one."""
