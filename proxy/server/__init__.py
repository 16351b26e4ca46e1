"""The process around the layers below: the aiohttp application and listeners, the request
pipeline, the Bedrock and files fronts, the upstream client, the admin API, configuration."""
