"""Device simulator driving every front-end over real HTTP. Not built yet."""
