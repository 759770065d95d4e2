"""Disk images for guests and the lab: recipes, the content-hash cache, builds."""
