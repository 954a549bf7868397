"""Full training / evaluation scripts behind the ``vefast`` CLI (toy, vr-table, tokenizer, DiT)."""
