"""What objects and parts are for: the small table behind `prima data build`'s functional questions.

Keys are verb phrases that complete "Which of these could you ...?"; values are category names as
`prima.data.coco.display_name` writes them (COCO, LVIS/PACO and PASCAL-Part spellings). Part entries
are ``object:part`` pairs, matching PACO's part categories. The table is deliberately small and
common-sense; extend it here, in one place, when a dataset brings new categories.
"""

from __future__ import annotations

OBJECT_AFFORDANCES: dict[str, tuple[str, ...]] = {
    "sit on": ("chair", "bench", "couch", "sofa", "stool", "toilet"),
    "sleep on": ("bed", "couch", "sofa"),
    "ride": ("horse", "bicycle", "motorcycle", "motorbike", "elephant", "skateboard", "surfboard"),
    "drink from": ("cup", "mug", "bottle", "wine glass", "glass", "can"),
    "eat food from": ("bowl", "plate", "tray"),
    "cut things with": ("knife", "scissors"),
    "eat with": ("fork", "spoon"),
    "play a game with": ("sports ball", "ball", "frisbee", "kite", "tennis racket", "baseball bat"),
    "carry things in": ("backpack", "handbag", "suitcase", "basket", "bucket", "box", "crate", "plastic bag"),
    "travel far in": ("car", "bus", "train", "airplane", "aeroplane", "boat", "truck"),
    "haul heavy cargo with": ("truck", "train"),
    "tell the time with": ("clock", "watch"),
    "read": ("book", "newspaper"),
    "light a room with": ("lamp",),
    "keep the rain off with": ("umbrella",),
    "watch a show on": ("tv", "television set", "tvmonitor", "laptop", "laptop computer"),
    "type on": ("keyboard", "laptop", "laptop computer", "calculator"),
    "make a call with": ("cell phone", "cellular telephone", "telephone"),
    "heat food in": ("microwave", "microwave oven", "oven"),
    "boil water in": ("kettle", "pan", "pot"),
    "write with": ("pen", "pencil"),
    "put flowers in": ("vase",),
    "tighten a bolt with": ("wrench", "pliers", "screwdriver"),
    "drive a nail with": ("hammer",),
    "sweep the floor with": ("broom",),
    "dry yourself with": ("towel",),
    "wash your hands with": ("soap", "sink"),
    "throw rubbish in": ("trash can",),
    "climb up": ("ladder",),
}

PART_AFFORDANCES: dict[str, tuple[str, ...]] = {
    "hold it by": (
        "mug:handle",
        "cup:handle",
        "knife:handle",
        "scissors:handle",
        "hammer:handle",
        "screwdriver:handle",
        "spoon:handle",
        "broom:handle",
        "pan:handle",
        "kettle:handle",
        "bucket:handle",
        "basket:handle",
        "handbag:handle",
        "drill:handle",
        "wrench:handle",
        "pliers:handle",
        "jar:handle",
        "vase:handle",
    ),
    "sit on": ("chair:seat", "bench:seat", "stool:seat", "bicycle:saddle", "car:seat"),
    "lean back against": ("chair:back", "bench:back"),
    "cut with": ("knife:blade", "scissors:blade", "blender:blade"),
    "drink from": ("mug:rim", "cup:rim", "glass:rim", "bottle:neck", "bottle:spout"),
    "steer it with": ("bicycle:handlebar", "car:steeringwheel"),
    "pedal with": ("bicycle:pedal",),
    "look through": ("car:windshield", "car:window", "watch:window"),
    "read the time on": ("clock:hand", "watch:hand", "watch:dial"),
    "open it by": ("box:lid", "jar:lid", "can:pull tab", "trash can:lid", "microwave oven:door handle"),
    "write with": ("pen:tip", "pencil:lead"),
    "erase a mistake with": ("pencil:eraser",),
    "press to use it": ("calculator:key", "remote control:button", "laptop computer:keyboard", "telephone:button"),
    "look at": ("laptop computer:screen", "cellular telephone:screen", "telephone:screen"),
    "climb it by": ("ladder:step",),
    "store things in": ("table:drawer", "table:shelf"),
    "put things on": ("table:top", "bench:table top"),
    "stand it on": ("lamp:base", "fan:base", "television set:base"),
    "fasten it with": ("belt:buckle", "watch:buckle", "shoe:lace"),
}


def object_uses(name: str) -> list[str]:
    """The verb phrases that apply to an object category (display name), in table order."""
    return [verb for verb, names in OBJECT_AFFORDANCES.items() if name in names]


def part_uses(object_name: str, part_name: str) -> list[str]:
    """The verb phrases that apply to part ``part_name`` of an ``object_name`` (display names)."""
    key = f"{object_name}:{part_name}"
    return [verb for verb, names in PART_AFFORDANCES.items() if key in names]
