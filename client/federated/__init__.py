"""The site's Flower ClientApp: trains on local data, returns weights only."""
