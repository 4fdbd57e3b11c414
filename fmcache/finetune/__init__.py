"""End-to-end fine-tuning: freezing, decapitation, resumable training loop, DDP, export (issue 12)."""
