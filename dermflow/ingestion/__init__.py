"""Getting data in: reading the dataset CSV, the URL guard, fetching images, decoding them."""
