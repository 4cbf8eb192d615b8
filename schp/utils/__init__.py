"""Small helpers with no project imports: geometry of the crop and inverse warp, palette, atomic outputs."""
