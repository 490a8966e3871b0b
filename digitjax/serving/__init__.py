"""`digitjax serve`: the HTTP app, its dynamic batching, request limits and the page."""
