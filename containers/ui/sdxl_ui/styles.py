"""The style presets the model server knows (ids it accepts, names people read); a test keeps them in step."""

STYLES: tuple[tuple[str, str], ...] = (
    ("none", "None"),
    ("3d-model", "3D Model"),
    ("analog-film", "Analog film"),
    ("anime", "Anime"),
    ("cinematic", "Cinematic"),
    ("comic-book", "Comic book"),
    ("modeling-compound", "Craft clay"),
    ("digital-art", "Digital Art"),
    ("enhance", "Enhance"),
    ("fantasy-art", "Fantasy art"),
    ("isometric", "Isometric"),
    ("line-art", "Line art"),
    ("low-poly", "Low poly"),
    ("neon-punk", "Neonpunk"),
    ("origami", "Origami"),
    ("photographic", "Photographic"),
    ("pixel-art", "Pixel art"),
    ("tile-texture", "Tile texture"),
)
