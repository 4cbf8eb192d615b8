"""The Pascal VOC colour map of the label PNGs."""
from schp.utils.palette import class_colors, get_palette


def test_pascal_palette_is_the_voc_colour_map():
    assert class_colors(7) == [(0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128),
                               (128, 0, 128), (0, 128, 128)]


def test_higher_classes_use_the_next_bits():
    colors = class_colors(20)
    assert colors[8] == (64, 0, 0)
    assert colors[9] == (192, 0, 0)
    assert colors[15] == (192, 128, 128)
    assert colors[19] == (128, 192, 0)  # 19 = 0b010011: bits (1,1,0) -> R 128, G 128; then (0,1,0) -> G 64
    assert len(set(colors)) == 20


def test_flat_layout_for_putpalette():
    assert get_palette(3) == [0, 0, 0, 128, 0, 0, 0, 128, 0]
