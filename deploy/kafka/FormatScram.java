// Formats the secured broker's storage with one SCRAM-SHA-512 user per password file
// (secrets/<name>.password), so no password ever appears on a command line (ps, logs).
// Run by broker.sh with Java's single-file source launcher, on the broker's own jars:
//   java -cp "$jars/*" FormatScram.java CLUSTER_ID CONFIG SECRETS_DIR
import java.nio.charset.StandardCharsets;
import java.nio.file.DirectoryStream;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;

public class FormatScram {
    public static void main(String[] args) throws Exception {
        List<String> argv = new ArrayList<>(List.of("format", "-t", args[0], "-c", args[1]));
        int users = 0;
        try (DirectoryStream<Path> files = Files.newDirectoryStream(Path.of(args[2]), "*.password")) {
            for (Path file : files) {
                String name = file.getFileName().toString().replace(".password", "");
                String password = Files.readString(file, StandardCharsets.UTF_8).strip();
                argv.add("--add-scram");
                argv.add("SCRAM-SHA-512=[name=" + name + ",password=" + password + "]");
                users++;
            }
        }
        System.out.println("formatting with " + users + " SCRAM-SHA-512 users");
        kafka.tools.StorageTool.main(argv.toArray(new String[0]));
    }
}
