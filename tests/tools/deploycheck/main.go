// deploycheck turns the deployment files in deploy/ into JSON for the integration test
// `deploy_files`:
//
//	deploycheck compose FILE   loads a Compose file the way `docker compose` does
//	                           (compose-go: schema validation, anchors and merge keys,
//	                           ${VAR:-default} interpolation from the environment) and
//	                           prints the resulting project
//	deploycheck yaml FILE      prints the YAML documents of FILE as a JSON array
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/compose-spec/compose-go/v2/cli"
	"gopkg.in/yaml.v3"
)

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: deploycheck compose|yaml FILE")
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "compose":
		err = compose(os.Args[2])
	case "yaml":
		err = yamlDocs(os.Args[2])
	default:
		err = fmt.Errorf("unknown mode %q (compose or yaml)", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "deploycheck:", err)
		os.Exit(1)
	}
}

func compose(path string) error {
	opts, err := cli.NewProjectOptions([]string{path}, cli.WithOsEnv)
	if err != nil {
		return err
	}
	project, err := cli.ProjectFromOptions(context.Background(), opts)
	if err != nil {
		return err
	}
	out, err := project.MarshalJSON()
	if err != nil {
		return err
	}
	_, err = os.Stdout.Write(out)
	return err
}

func yamlDocs(path string) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	docs := []any{}
	for {
		var doc any
		if err := dec.Decode(&doc); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			return fmt.Errorf("%s: %w", path, err)
		}
		if doc != nil {
			docs = append(docs, doc)
		}
	}
	return json.NewEncoder(os.Stdout).Encode(docs)
}
