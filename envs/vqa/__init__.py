"""easy-vqa: real small VQA data (shapes and colours) for VLM SFT; see envs.vqa.data."""
