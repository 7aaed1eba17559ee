"""A site's local data: dataset names mapped to loaders. Data never leaves the site."""
