"""Adapter mechanisms on stock PEFT: elastic ranks and widths, masks, NOLA bases, shortcuts, saliency."""
