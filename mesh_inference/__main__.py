from mesh_inference.cli.main import main

main()
