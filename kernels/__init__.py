"""StoryKit's tensor code in plain torch: no ComfyUI imports, so it runs and is tested without the host."""
