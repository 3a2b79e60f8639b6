"""medfoundry.distributed"""
