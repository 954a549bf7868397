"""Reference models for the recipes: conv tokenizer, DiT/SiT/LightningDiT, 2D toy MLPs."""
