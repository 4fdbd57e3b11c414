from fmcache.cli import main

main()
