"""The 23 AVSBench S4 categories, in the reference code's class order (index 0..22)."""

S4_CLASSES = (
    "baby_laughter", "female_singing", "male_speech", "dog_barking", "cat_meowing",
    "lions_roaring", "horse_clip-clop", "coyote_howling", "mynah_bird_singing",
    "playing_acoustic_guitar", "playing_tabla", "playing_violin", "playing_piano",
    "playing_ukulele", "playing_glockenspiel", "helicopter", "race_car", "driving_buses",
    "ambulance_siren", "typing_on_computer_keyboard", "chainsawing_trees",
    "cap_gun_shooting", "lawn_mowing",
)
CLASS_INDEX = {name: i for i, name in enumerate(S4_CLASSES)}
NO_CLASS = -1  # MS3 videos have no category


def class_index(category: str | None) -> int:
    """Index of an S4 category; NO_CLASS for None (MS3). KeyError names the bad category."""
    if category is None:
        return NO_CLASS
    try:
        return CLASS_INDEX[category]
    except KeyError:
        raise KeyError(f"unknown category {category!r} (not one of the 23 AVSBench S4 classes)") from None
