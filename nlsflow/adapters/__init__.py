"""Adapter mechanisms on stock PEFT: elastic ranks and widths, sparsity masks, NOLA bases, shortcuts, saliency selection."""
