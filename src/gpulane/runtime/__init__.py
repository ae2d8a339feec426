"""Workers: launching, supervising and feeding them."""
